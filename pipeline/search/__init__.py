"""Mixed-precision search: cost model and search space, priors, the Optuna study, the objective."""
