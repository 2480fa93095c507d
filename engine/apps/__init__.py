"""The user-facing tools beside training: the `zerotrain` command and what its subcommands run.

    cli.py             the `zerotrain` command: one subcommand per tool
    generate.py        loading a model (and adapter) for inference; generate and chat
    evaluate.py        loss and perplexity of a model on data files (`zerotrain eval`)
    serve.py           an OpenAI-compatible HTTP server
    teacher_logits.py  storing a distillation teacher's top-k log-probs before training
    plot.py            loss, lr and tokens/s curves of runs
    env_report.py      versions, devices and build tools for bug reports
    preflight.py       checking the hosts of a hostfile before a multi-node launch
"""
