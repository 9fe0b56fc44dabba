"""The MLproject entry points: thin Click scripts over covid_xray (`python -m entrypoints.X`)."""
