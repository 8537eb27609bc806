"""Agent stage: the search-agent protocol (`protocol`), policy loading (`policy`), the batched multi-turn rollout
engine (`rollout`) and the retrieval baselines (`baselines`). Modules are imported where used (no work here)."""
