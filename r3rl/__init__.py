"""r3rl: RL for image generators that reflect on their own output and refine it."""

__version__ = "0.1.0"
