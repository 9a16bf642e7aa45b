"""The model server behind one facade: connections, requests, health probes and their errors."""
