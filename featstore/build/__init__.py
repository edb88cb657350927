"""featstore/build: compute a data root's features into the store (docs/BUILD.md).

    plan.py, annotations.py  which units (encoder calls) exist: a scan, or training's annotation files
    plan_record.py           what a feature set remembers of its plan (verify, gc, info use it)
    recipes.py               published recipes' encoder settings (VG-LLM, JanusVLN)
    options.py               BuildOptions (what to build), BuildContext (one rank's resolved build)
    report.py                BuildReport (counts, failures, stage times)
    freshness.py             the split of the plan into fresh / missing / stale
    estimate.py              bytes to add, free disk space
    frames.py                decode workers (DataLoader) feeding the GPU loop
    encode.py                encode one unit or batch (shared with verify and training)
    pipeline.py              the GPU loop, serialiser and writer threads
    distributed.py           torchrun ranks: process group, barriers, the gathered report
    runner.py                `build(BuildOptions) -> BuildReport`: the stages in order
    cli.py                   `featstore build`: flags -> BuildOptions -> build -> summary

Nothing is imported here: training imports `featstore.build.plan` without loading the build
(tests/test_seams.py). Import the build from `featstore.build.runner`.
"""
