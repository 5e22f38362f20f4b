"""apexdsp.optimizers"""
