"""The work behind the deployment commands of `dynseg` (sdk/cli.py parses arguments and prints; these
modules do the work and return what the command reports).

- `defaults`: the synthetic training run's defaults that `dynseg train` and `dynseg quickstart` share.
- `images`: which detections go with which image file (a COCO results file, or generated boxes).
- `infer`: segment image files with an exported model; overlays, instance-id PNGs, COCO results.
- `parity`: the exported model against its checkpoint (`dynseg validate`), a report truthy on pass.
- `evaluate`: a checkpoint or an exported model scored on a dataset (`dynseg eval`; needs torch).
- `bench`: latency and throughput of an exported model over detection counts and image sizes.
- `quickstart`: train, evaluate, export, validate and segment in one go (needs torch).
- `progress`: the progress displays (a bar on a terminal, plain lines elsewhere): per image here, and
  the clock and bar the trainer's per-step display is built on.

Only `quickstart`, `evaluate` and the torch side of `parity` need torch; they import it when they run.
"""
