"""Training stages and their objectives, one module per stage (base.py says what a stage is).

    base.py        Stage, Objective, LossSums: the interface the loop calls
    tokens.py      the trained-token rule and per-token losses, shared by every objective
    causal_lm.py   pretrain and sft: next-token cross-entropy
    preference.py  dpo: DPO, IPO, ORPO, SimPO over preference pairs
    distill.py     distill: a frozen teacher's distributions into the student
    frozen/        the models beside the trained one: reference, teacher, rollouts
"""
