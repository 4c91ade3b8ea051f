"""What a trained student is worth: the evaluation against the teacher at several step counts (`evaluator`),
its image metrics (`metrics`), the validation grids during training (`validation`, drawn by `grids`), the
`lcm-exp-eval` job (`job`) and the sweep report (`report`). It imports `config`, `data`, `teachers` and
`tracking`; the runner and the entry points import it."""
