"""nightrender's shared domain: settings, database, tables, job states and queue names."""
