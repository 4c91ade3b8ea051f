"""The data layer: resumable streams of batches from WebDataset shards (`stream`), image shards as img2dataset
writes them (`wds`), precomputed latents (`cached`), the embedded procedural dataset (`shapes`) and its
adherence checker (`adherence`). It imports only `lcm_exp.config`.

Data builders, one per option of `conf/data/`. Each takes its config keys and, at run time, `batch_size`,
`rank`, `world_size`, `teacher`, `state` (a checkpoint's data position, or None) and `endless` (false: one pass,
for precomputing and evaluation), and returns an iterable of batches ({"pixels" | latents, "captions",
"n_skipped", "data_state"}) whose stream (`stream_of`) has `resolution` and `state(...)`."""
from .cached import cached_loader
from .sources import EvalSource, shapes_loader, shapes_source, stream_of, webdataset_loader

__all__ = ["EvalSource", "cached_loader", "shapes_loader", "shapes_source", "stream_of", "webdataset_loader"]
