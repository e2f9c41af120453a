"""Submission to postfix: our own SMTP client and the pool of authenticated sessions."""
