"""Monitor a crystallization: impurity fraction over time and a statistically sound alarm."""
