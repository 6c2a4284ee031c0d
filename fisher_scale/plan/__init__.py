"""Will it fit: a run's per-rank memory planned from its config before any cluster work (``fisher-scale plan``)."""

from fisher_scale.plan.memory import MemoryPlan, ModelFacts, model_facts, plan_memory

__all__ = ["MemoryPlan", "ModelFacts", "model_facts", "plan_memory"]
