"""The training engine behind train.py and train_tokenizer.py.

train_cli / train_tokenizer_cli hold each command's flags and main; ar_trainer / tokenizer_trainer the model-specific
step, validation and checkpoint content; loop the epoch/step loop both share, talking to a trainer through trainer's
protocol. Around it: seeds (seed streams, RNG states), checkpoints (run folder, checkpoint files, resume), stopping
(signals, non-finite losses), amp (autocast, loss scaling, clipping, accumulation), optim (weight-decay groups, lr and
wd schedules), dist (torchrun, replica digest, DDP), data and token_cache, flags (the shared flags and the derived
Plan) and supernet (VARiant supernet training).
"""
