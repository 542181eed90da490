"""Tree search for warm-start data: mcts (search over grounded steps with a teacher), trees (the tree
records `vigorl mcts` writes), linearize (trees -> SFT reasoning chains)."""
