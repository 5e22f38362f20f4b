"""apexdsp.programs"""
