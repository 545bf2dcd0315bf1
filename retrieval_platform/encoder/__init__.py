"""The Siamese dual encoder and its offline backbones."""
