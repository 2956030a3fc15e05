"""The user commands' code: `launch/<name>.py` in a checkout and the installed console scripts
`slope-pretrain`, `slope-prepare-data`, `slope-generate` and `slope-export` both call the
`main()` of the module of that name here."""
