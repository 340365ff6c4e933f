"""helloworld: the vHive contract's minimal function, "Hello, <name>!"."""


def handle(name, input_set):
    return f"Hello, {name}!"
