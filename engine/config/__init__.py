"""The typed run configuration, built once at start-up and checked before any work.

    sections.py   the sections every run has (model, lora, data, optim, train, checkpoint,
                  distributed), one dataclass each with its checks; a stage's own section is
                  declared beside its objective (engine.objectives)
    tree.py       Config: the common sections plus the stage's, from a flat or nested mapping
    parse.py      --config YAML plus flags -> Config (engine.stages.config_for for a launcher)
    deepspeed.py  the DeepSpeed JSON: engine settings only, "auto" fields filled from Config
    precision.py  precision names and the torch dtypes they stand for
"""
