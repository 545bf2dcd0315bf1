"""Sharded FAISS indexes: typed build/search/merge functions and the versioned index folder."""
