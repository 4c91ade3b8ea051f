"""What a run hands to diffusers and MLflow users: the export of a student as a pipeline folder or LoRA weights
(`exporter`, also `lcm-exp-export` of any checkpoint), and its registration in the MLflow Model Registry
(`registry`) as a pyfunc model (`pyfunc_model`, a file saved into the model that imports no lcm_exp). It
imports `config`, `distill`, `teachers`, `students` and `tracking`."""
