"""Experimental setups that several methods' papers share, in one place.

Finn et al. 2017's sinusoid, Omniglot and miniImageNet setups are MAML's defaults, and the
papers of ANIL, Meta-SGD, MAML++ and Meta-LSTM's sinusoid runs follow them (each method's
module says which values it changes).
"""

# Finn et al. 2017, sec. 5 and their code: sinusoid K = 10, 25 tasks, alpha = 0.01, 10 steps
# at test; Omniglot 5-way, 32 tasks, alpha = 0.4, 1 step in training and 3 at test.
FINN_2017 = {
    "sinusoid": dict(
        shots=10,
        queries=10,
        meta_batch=25,
        inner_lr=0.01,
        inner_steps=1,
        eval_inner_steps=10,
        outer_lr=1e-3,
        iterations=8000,
        val_every=2000,
    ),
    "omniglot": dict(
        shots=1,
        queries=15,
        meta_batch=32,
        inner_lr=0.4,
        inner_steps=1,
        eval_inner_steps=3,
        outer_lr=1e-3,
        iterations=60000,
        val_every=500,
    ),
    # Finn et al. 2017, sec. 5.2: 5 inner steps of 0.01 in training, 10 at test, 4 tasks per
    # meta-batch (the 1-shot setting), 15 queries per class; their 32-filter Conv4 is
    # `--backbone conv4-32` (the default, 64 filters, overfits sooner).
    "mini-imagenet": dict(
        shots=1,
        queries=15,
        meta_batch=4,
        inner_lr=0.01,
        inner_steps=5,
        eval_inner_steps=10,
        outer_lr=1e-3,
        iterations=60000,
        val_every=500,
    ),
}
