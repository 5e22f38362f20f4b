"""apexdsp.experiments"""
