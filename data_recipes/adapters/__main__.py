"""`python -m data_recipes.adapters SOURCE --schema NAME --out FILE.jsonl`: convert a dataset to rows."""

from data_recipes.adapters.loading import main

main()
