"""Reading data (local files and hub sets, in every row format), encoding rows into tokens and masks,
and the embedded toy task."""
