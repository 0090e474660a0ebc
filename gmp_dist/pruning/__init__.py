"""Pure pruning math: selection, the Global MP + MT decision, the method registry (``methods``), masks,
schedules, reports.

Nothing here imports torch.distributed, Ray, MLflow or the config module (design.md §2).
"""
