"""Training on several processes: launch.py (who am I, how do the ranks meet), spawn.py
(`--gpu 0,1` starts its own workers) and data_parallel.py (gradient and cost sync).
Importing this package starts nothing."""
