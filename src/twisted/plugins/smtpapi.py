"""twistd plugin dropin: makes `twistd smtpapi` find mailcow-smtp-api's service maker."""

from mailcow_smtp_api.tap import SmtpApiServiceMaker

smtpapi = SmtpApiServiceMaker()
