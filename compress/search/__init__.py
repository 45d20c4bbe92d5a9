"""Structural search (N2N-style): removable/shrinkable units, candidate surgery, LSTM policies,
reward and the REINFORCE search loop behind the `search` stage."""
