"""Tools for development: the sample-data generator, the in-process sandbox and a local
webserver + daemon for end-to-end tests and benchmarks. Production code never imports these."""
