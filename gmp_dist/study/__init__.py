"""`gmp-dist study`: the paper's comparison (methods x sparsities, one-shot and fine-tuned) as one command.

config (the study file and its base run config) -> grid (the dense run and every point, validated) ->
runner (MLflow parent, dense once, points in this process, resumable) -> tables + plots (the outputs).
"""
