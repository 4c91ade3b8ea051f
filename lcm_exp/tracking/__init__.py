"""MLflow: a run's tracker (`tracker`: params, tags, metrics and artifacts through a background sender), the
sweep's parent run (`sweeps`), run names and group choices (`names`), which params apply to a run
(`applicability`), the UI's comparison view (`view`), system metrics, provenance tags, and the persistent
Optuna study that search workers share (`study`). It imports only `lcm_exp.config`."""
