"""The training loop and its setup, shared by every stage.

    main.py       the launchers' entry point: parse, set up, train, exit cleanly
    plan.py       every check that needs no process group, before any expensive work -> RunPlan
    build.py      data, model and DeepSpeed engine from the plan -> Data, Model, engine
    parts.py      those parts, as plain records
    init_from.py  the weights a run starts from (a preset, or what --init-from names)
    lora.py       LoRA through peft while training
    trainer.py    the loop: get batch -> forward -> backward -> step -> log / eval / save
    watchdog.py   stalls and dead ranks: stacks dumped, the job ended
"""
