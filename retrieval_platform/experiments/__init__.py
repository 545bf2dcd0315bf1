"""Online experiments behind one endpoint: arms and their sticky assignment, team-draft
interleaving, the impression and event log, its analysis, and a click-model simulation."""
