"""The pure core: values, validation, MIME, mailcow's rules, errors, configuration. No Twisted, no I/O."""
