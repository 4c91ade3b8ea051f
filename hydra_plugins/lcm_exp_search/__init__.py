"""Hydra plugin of lcm_exp: `hydra/sweeper=lcm_exp_search`, a search on a persistent Optuna study (search_sweeper.py).

Hydra finds it because `hydra_plugins` is a namespace package (no __init__.py there) shared with Hydra's own
plugins; everything imported here at Hydra's start-up stays light (Optuna is imported when a search starts)."""
