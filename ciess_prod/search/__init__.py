"""CIESS search: TD3 agents with random-walk exploration choose a size per embedding row under budgets."""

from ciess_prod.search.plan import PLAN_SCHEMA, DimensionPlan, PlanError, repair_to_budget

__all__ = ["PLAN_SCHEMA", "DimensionPlan", "PlanError", "repair_to_budget"]
