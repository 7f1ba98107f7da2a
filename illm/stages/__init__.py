"""The training loops of the three MS-ILLM stages, one module each."""
