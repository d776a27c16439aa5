"""yagg: yet another GIF generator (the command line and config loading; the stages live in pipeline/, model/,
train/ and eval/)."""
