"""The controls: the random and blind networks, and the planted control (a unit made to memorize).
May import: models, data, metric, errors."""
