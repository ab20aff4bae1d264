"""Runs a tlsfuzzer script against a server that requires a client certificate.

Most tlsfuzzer scripts expect a server that does not ask for a client
certificate. holdfast always does (mutual TLS is its job), so this wrapper
rewrites each conversation before it runs: wherever the script expects the
server's certificate it first expects a CertificateRequest, and wherever the
client finishes a full handshake it first sends the device's certificate
and a CertificateVerify. Conversations that end before that (the negative
probes) are untouched. Usage:

    python mtls.py --key DEVICE.key --cert DEVICE.pem SCRIPT [script args]

SCRIPT is the script's name as in tlsfuzzer's scripts/ (e.g.
test-tls13-keyupdate.py); its arguments follow. tests/tlsfuzzer.rs runs it.
"""

import importlib
import sys

from tlsfuzzer import runner
from tlsfuzzer.expect import (ExpectCertificate, ExpectCertificateRequest,
                              ExpectCertificateVerify,
                              ExpectEncryptedExtensions, ExpectFinished,
                              ExpectServerHelloDone, ExpectServerKeyExchange)
from tlsfuzzer.messages import (CertificateGenerator,
                                CertificateVerifyGenerator,
                                ChangeCipherSpecGenerator,
                                ClientHelloGenerator,
                                ClientKeyExchangeGenerator, FinishedGenerator)
from tlslite.utils.keyfactory import parsePEMKey
from tlslite.x509 import X509
from tlslite.x509certchain import X509CertChain


def between(node, new):
    """Puts `new` between `node` and its child."""
    new.child = node.child
    node.child = new
    return new


def add_client_auth(root, chain, key):
    """Adds client authentication to every full handshake under `root`.

    Idempotent: a conversation run twice (sanity first and last) is
    rewritten once."""
    seen = set()
    # (node, whether the path to it holds the server's TLS 1.3
    # CertificateVerify, i.e. this is a TLS 1.3 full handshake)
    stack = [(root, False)]
    while stack:
        node, tls13_full = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        child = node.child
        if isinstance(node, ExpectCertificateVerify):
            tls13_full = True
        # A new ClientHello (a second connection, e.g. a resumption) starts
        # a new handshake: a resumed one has no certificates at all.
        if isinstance(node, ClientHelloGenerator):
            tls13_full = False
        # TLS 1.3: EncryptedExtensions, CertificateRequest, Certificate.
        if isinstance(node, ExpectEncryptedExtensions) and \
                isinstance(child, ExpectCertificate):
            between(node, ExpectCertificateRequest())
        # TLS 1.2: ServerKeyExchange, CertificateRequest, ServerHelloDone.
        elif isinstance(node, (ExpectServerKeyExchange, ExpectCertificate)) \
                and isinstance(child, ExpectServerHelloDone):
            between(node, ExpectCertificateRequest())
        # TLS 1.3: after the server's Finished (and a compatibility CCS,
        # if the script sends one), Certificate and CertificateVerify go
        # before the client's Finished.
        elif isinstance(node, ExpectFinished) and tls13_full:
            at = node
            while isinstance(at.child, ChangeCipherSpecGenerator):
                at = at.child
            if isinstance(at.child, FinishedGenerator):
                between(between(at, CertificateGenerator(chain)),
                        CertificateVerifyGenerator(key))
        # TLS 1.2: Certificate before ClientKeyExchange, CertificateVerify
        # after it.
        elif isinstance(node, ExpectServerHelloDone) and \
                isinstance(child, ClientKeyExchangeGenerator):
            between(node, CertificateGenerator(chain))
            if isinstance(child.child, ChangeCipherSpecGenerator):
                between(child, CertificateVerifyGenerator(key))
        stack.append((node.child, tls13_full))
        stack.append((node.next_sibling, tls13_full))
    return root


def main():
    args = sys.argv[1:]
    key_path = cert_path = None
    while args and args[0] in ('--key', '--cert'):
        if args[0] == '--key':
            key_path = args[1]
        else:
            cert_path = args[1]
        args = args[2:]
    if not key_path or not cert_path or not args:
        sys.exit(__doc__)
    with open(key_path) as f:
        key = parsePEMKey(f.read(), private=True)
    cert = X509()
    with open(cert_path) as f:
        cert.parse(f.read())
    chain = X509CertChain([cert])

    original = runner.Runner.__init__

    def init(self, conversation):
        original(self, add_client_auth(conversation, chain, key))

    runner.Runner.__init__ = init
    script = args[0]
    name = script.rsplit('/', 1)[-1][:-len('.py')].replace('-', '_')
    sys.argv = [script] + args[1:]
    importlib.import_module('tlsfuzzer._apps.' + name).main()


if __name__ == '__main__':
    main()
