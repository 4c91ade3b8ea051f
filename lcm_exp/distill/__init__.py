"""The algorithm: one step of latent consistency distillation (`lcd`, LCM Alg. 1) and the interchangeable parts
it is made of, each a config group: `methods` (where the target point comes from), `solvers` (the teacher's ODE
step), `skip` (the skip-step grid), `losses`, `guidance` (ω and its embedding), `ema` (the target network) and
`schedules` (a teacher family's noise schedule). Pure torch: it imports only `lcm_exp.config`."""
