"""Training: state, optimizer, the jitted data-parallel step, checkpoints and the loop."""
