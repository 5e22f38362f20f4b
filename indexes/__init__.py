"""apexdsp.indexes"""
