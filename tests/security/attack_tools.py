"""A tool no tenant in the attack tests is allowed to use."""


async def export_everything(ctx):
    return {"exported": "every tenant's data"}
