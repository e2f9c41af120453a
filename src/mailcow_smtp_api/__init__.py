"""mailcow-smtp-api: an HTTP send API beside postfix-mailcow."""
