"""Training on several processes. The job: launch.py (who am I, how do the ranks meet), spawn.py
(`--gpu 0,1` starts its own workers), agent.py (torchrun with one-line errors), ranks.py (the
ranks' collectives). How a net trains across them: strategy.py (the protocol and registry) and
its implementations single.py, data_parallel.py and passes.py; sharding.py says which rows each
rank holds. The pass schedule of spec §8: plan.py, placement.py, program.py, backward.py,
minibatch.py, steps.py, model_parallel.py, p2p.py, holders.py. Importing this package starts
nothing."""
