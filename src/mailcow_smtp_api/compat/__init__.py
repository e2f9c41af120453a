"""Front ends in other providers' shapes (Mailgun, Postmark): each translates a request into the
native pipeline's request objects and renders the native outcome in the provider's answer shape.
They never check anything themselves: validation, the sender rule and the limits are the pipeline's."""
