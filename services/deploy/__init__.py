"""``bedside deploy``: install or upgrade the Helm release for a model from the optimizer's
repository, wait for the rollout and for Triton's model readiness, roll back on failure."""
