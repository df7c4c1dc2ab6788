"""CDS Hooks 2.0: discovery, prefetch, cards (en/ko), feedback, and the EHR's JWT."""
