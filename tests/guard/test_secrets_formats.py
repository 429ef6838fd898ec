"""Secrets detector: the reviewer's false positives (lookups, ordinary words, keywords inside other
words) and misses (Chinese disclosures, short passwords, CLI flags, Basic auth, provider formats)."""

from __future__ import annotations

import time

import pytest

from steward.guard import ScanContext, normalise
from steward.guard.secrets import SECRET_ENTITIES, PrivateKeyDetector, SecretsScanner

SECRETS = SecretsScanner()


def found(text: str) -> set[tuple[str, str]]:
    doc = normalise(text)
    return {(f.entity, text[f.start : f.end]) for f in SECRETS.scan(doc, ScanContext()) if f.score >= 0.5}


# ---- false positives: none of these holds a secret -------------------------------------------------

NOT_SECRETS = [
    # an ordinary English word after "password is"
    "It says my password is incorrect",
    "Error: password is required",
    "your password is invalid, try again",
    "the password was wrong",
    "Password: too short",
    # code that looks a secret up instead of containing one
    'password = request.form["password"]',
    "password = getpass.getpass()",
    'password=os.getenv("DB_PASS")',
    "password=settings.DB_PASSWORD",
    "self.password = password_input",
    "password_hash = bcrypt.hashpw(pw, salt)",
    "api_key=settings.OPENAI_API_KEY_V2",
    "client_secret = config['oauth']['client_secret']",
    "token = get_token(user, scope='read')",
    "password: str",
    "api_key: Optional[str] = None",
    "PASSWORD=DB_PASSWORD_FROM_VAULT",
    '"password": "string"',
    '"password": "********"',
    "password = passwordInput",
    # a secret keyword inside another word, or a name/URL that is not a secret
    "tokenizer: meta-llama/Llama-3.1-8B-Instruct",
    "--tokenizer=Qwen/Qwen2.5-7B-Instruct",
    "token_url: https://oauth2.googleapis.com/token",
    "auth_uri: https://accounts.google.com/o/oauth2/auth",
    '"author": "https://github.com/janedoe123"',
    '"secretName": "prod-db-credentials-v2"',
    "secret_name: prod-db-credentials-v2",
    "compass=N45E12345678",
    "bypass: Xy7kLm9qR2abc",
    "token_count = 4096",
    "the secret is to knead the dough longer",
    "The secret is patience",
    "api_key: projects/my-project/secrets/openai-key/versions/latest",
    # Chinese: the word for password with no password after it
    "请输入密码",
    "密码学是一门学科",
    "我忘记了密码是多少",
    "密码错误，请重试",
    # CLI flags with a placeholder, or no value
    "curl -u $USER:$PASS https://api.example.com",
    "docker run -u 1000:1000 image",
    "mysql -u root -p mydb",
    "docker login --password-stdin",
    "sshpass -p $SSHPASS ssh host",
    # URLs with an empty or placeholder password
    "redis://redis:6379/0",
    "redis://:${REDIS_PASSWORD}@redis:6379/0",
    "Authorization: Basic realm=site",
    "Basic training starts Monday",
    # values that end where a call ends, and other look-alikes
    "connect(user='app', password=password)",
    "Boarding pass: BA1234567",
    "Pass: 120 Fail: 3",
    "cache_key = user_profile_12345678",
    "monkey: 1234567890abcdefXYZ",
    '"password": "Passwort"',
    '"password": "Enter your password"',
]


@pytest.mark.parametrize("text", NOT_SECRETS)
def test_not_a_secret(text: str) -> None:
    assert found(text) == set()


# ---- misses: each of these holds a password or secret, and the span covers it ----------------------

PASSWORDS = [
    # Chinese disclosures
    ("我的密码是Abc123456", "Abc123456"),
    ("密码为 abc12345678", "abc12345678"),
    ("密码 abc12345678", "abc12345678"),
    ("口令：Abc123456!", "Abc123456!"),
    ("邮箱密码是：Xy7kLm9q，别告诉别人", "Xy7kLm9q"),
    # short passwords after a clear disclosure
    ("my password is hunter2", "hunter2"),
    ("password: 123456", "123456"),
    ('"password": "qwerty"', "qwerty"),
    ("PASSWORD=letmein", "letmein"),
    # other key spellings
    ("DB_PASS=Xy7kLm9qR2", "Xy7kLm9qR2"),
    ('{"pass": "Xy7#kLm9qR"}', "Xy7#kLm9qR"),
    ("MYSQL_ROOT_PASSWORD=s3cretpw", "s3cretpw"),
    ("dbPassword: 'Tr0ub4dor'", "Tr0ub4dor"),
    ("connect(user='app', password=Xy7kLm9qR2)", "Xy7kLm9qR2"),
    # command lines
    ("curl -u admin:Xy7kLm9qR2 https://api.example.com", "Xy7kLm9qR2"),
    ("curl -u admin:secret https://api.example.com", "secret"),
    ("curl --user 'deploy:Xy7kLm9qR2' https://x", "Xy7kLm9qR2"),
    ("mysql -u root -pXy7kLm9qR2 mydb", "Xy7kLm9qR2"),
    ('sshpass -p "Xy7kLm9qR2" ssh root@host', "Xy7kLm9qR2"),
    ("docker login -u user -p Xy7kLm9qR2 registry.example.com", "Xy7kLm9qR2"),
    ("psql --password=Xy7kLm9qR2 -h db", "Xy7kLm9qR2"),
    # credentials in a URL with no user name (pii's URL_CREDENTIALS needs one)
    ("redis://:myredispassword@redis:6379/0", "myredispassword"),
    # HTTP Basic: base64 of user:password
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
]


@pytest.mark.parametrize(("text", "span"), PASSWORDS)
def test_password_found(text: str, span: str) -> None:
    assert ("PASSWORD", span) in found(text)


SECRET_VALUES = [
    ("JWT_SECRET=mysupersecretjwtkey", "mysupersecretjwtkey"),
    ("client_secret = 'correcthorsebattery'", "correcthorsebattery"),
    ("OPENAI_API_KEY_V2=q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J", "q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J"),
    ("x-api-key: q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J", "q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J"),
    ("accessToken = 'q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J'", "q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J"),
    ("密钥：q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J", "q8Zr1Lx0Vt7Bn2Mk4Pw9Hs3J"),
]


@pytest.mark.parametrize(("text", "span"), SECRET_VALUES)
def test_secret_value_found(text: str, span: str) -> None:
    assert ("SECRET", span) in found(text)


# ---- provider formats: a positive and a near miss each ---------------------------------------------

PROVIDERS = [
    ("ANTHROPIC_API_KEY", "sk-ant-oat01-" + "x9Y8_" * 16, "sk-ant-oat01-short"),
    ("ANTHROPIC_API_KEY", "sk-ant-api03-" + "x9Y8" * 23 + "AA", "sk-ant-api03"),
    ("SLACK_TOKEN", "xapp-1-A0123ABCDEF-1234567890123-" + "0a1b2c3d" * 8, "xapp-1-A0123-12-abc"),
    ("SLACK_TOKEN", "xoxe-1-" + "My0xLTEtMjMzNDU2" * 5, "xoxe-1-short"),
    ("SECRET", "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_short"),
    ("SECRET", "https://api.telegram.org/bot123456789:AAH" + "d7Kx9Lm2" * 4, "bot123:AAHd7"),
    ("SECRET", "dop_v1_" + "0123456789abcdef" * 4, "dop_v1_" + "0123456789abcdeg" * 4),
    ("SECRET", "shpat_" + "0123456789abcdef" * 2, "shpat_" + "0123456789abcdef"),
    ("SECRET", "shpss_" + "fedcba9876543210" * 2, "shpss_" + "xyz" * 10),
    ("SECRET", "GOCSPX-" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7c", "GOCSPX-short"),
    ("SECRET", "gsk_" + "aB3dE6gH9jK2mN5pQ8sT" * 2 + "1vW4yZ7cAbCd", "gsk_" + "ab" * 10),
    ("SECRET", "hvs." + "CAESI" + "aB3dE6gH9jK2mN5pQ8sT" * 5, "hvs.abc"),
    ("SECRET", "PMAK-" + "0123456789abcdef01234567" + "-" + "0123456789abcdef" * 2 + "01", "PMAK-1234"),
    ("GITLAB_TOKEN", "glpat-" + "aB3dE6gH9jK2mN5pQ8sT", "glpat-short"),
    ("NPM_TOKEN", "npm_" + "aB3" * 12, "npm_" + "aB3" * 5),
    ("SENDGRID_KEY", "SG." + "a1B2" * 5 + "c3" + "." + "D4e5" * 10 + "F6g", "SG.abc.def"),
    ("PYPI_TOKEN", "pypi-AgEIcHlwaS5vcmc" + "Ab1_" * 14, "pypi-AgEIcHlwaS5vcmc" + "Ab1_"),
    ("TWILIO_KEY", "SK" + "0123456789abcdef" * 2, "SK" + "0123456789abcdeg" * 2),
]


@pytest.mark.parametrize(("entity", "token", "near_miss"), PROVIDERS)
def test_provider_formats(entity: str, token: str, near_miss: str) -> None:
    hits = found(f"key is {token} ok")
    assert any(e == entity and span in token for e, span in hits), hits
    assert found(f"see {near_miss} ok") == set()


def test_provider_findings_name_the_provider() -> None:
    doc = normalise("shpat_" + "0123456789abcdef" * 2)
    (f,) = SECRETS.scan(doc, ScanContext())
    assert f.entity == "SECRET" and f.subtype == "shopify_token" and "Shopify" in f.reason


def test_findings_never_carry_the_password() -> None:
    for text, span in PASSWORDS:
        for f in SECRETS.scan(normalise(text), ScanContext()):
            assert span == "secret" or span not in str(f.to_dict()), text  # "secret": the category


def test_every_emitted_entity_is_declared() -> None:
    texts = [t for t, _ in PASSWORDS + SECRET_VALUES] + [p[1] for p in PROVIDERS] + NOT_SECRETS
    emitted = {f.entity for t in texts for f in SECRETS.scan(normalise(t), ScanContext())}
    assert emitted <= SECRET_ENTITIES


def test_scanning_2000_tokens_stays_fast() -> None:
    """About 2,000 tokens of prose, code and config with secret-like words throughout: a loose bound
    (tens of milliseconds) that catches a pathological regex, not a benchmark."""
    chunk = (
        "The quarterly report covers revenue and the roadmap. "
        'password = settings.DB_PASSWORD\napi_key = os.getenv("OPENAI_API_KEY")\n'
        "tokenizer: meta-llama/Llama-3.1-8B-Instruct\nauth_uri: https://accounts.google.com/o/oauth2/auth\n"
        "curl -u $USER:$PASS https://api.example.com\n登录时如果密码错误，请联系管理员。\n"
    )
    text = (chunk * 40)[:8000]
    doc = normalise(text)
    SECRETS.scan(doc, ScanContext())
    t0 = time.perf_counter()
    for _ in range(10):
        assert SECRETS.scan(doc, ScanContext()) == []
    assert (time.perf_counter() - t0) / 10 < 0.05


# ---- review s30: linear time on adversarial command lines and PEM headers ---------------------------


@pytest.mark.parametrize(
    "text",
    [
        "curl -u " * 7_000,  # 56,000 characters: each "curl" used to be read to the end of the line
        "mysql " * 9_000 + " -p",
        "mariadb " * 7_000 + " -p",
        "sshpass " * 7_000 + " -p",
        "docker login " * 4_500 + " -p",
    ],
    ids=["curl", "mysql", "mariadb", "sshpass", "docker-login"],
)
def test_command_line_passwords_take_linear_time(text: str) -> None:
    # The old patterns took ~5 s on these (quadratic); the bound is far above linear time.
    doc = normalise(text)
    t0 = time.perf_counter()
    SECRETS.scan(doc, ScanContext())
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("curl -s https://x -u admin:Xy7kLm9qR2 && curl -u ops:Zq8wLp3mN1 https://y", "Xy7kLm9qR2"),
        ("curl -s https://x -u admin:Xy7kLm9qR2 && curl -u ops:Zq8wLp3mN1 https://y", "Zq8wLp3mN1"),
        ("curl https://api.example.com \\\n  -u admin:Xy7kLm9qR2", "Xy7kLm9qR2"),  # a continued line
        ("mysqldump -h db -u root -pXy7kLm9qR2 app", "Xy7kLm9qR2"),
        ("echo ok\nmariadb -u root -p'Xy7kLm9qR2'", "Xy7kLm9qR2"),
        ("podman login -u me -p Xy7kLm9qR2 quay.io", "Xy7kLm9qR2"),
    ],
)
def test_command_line_password_variants(text: str, span: str) -> None:
    assert ("PASSWORD", span) in found(text), found(text)


def test_a_flag_on_another_line_is_not_the_command_s() -> None:
    assert found("curl https://example.com\nls -u admin:Xy7kLm9qR2") == set()


def test_repeated_pem_begin_lines_take_linear_time() -> None:
    # 320,000 characters of BEGIN lines and no END: each BEGIN used to look 20,000 characters ahead
    # for an END line (~6 s); the bound is far above linear time.
    text = "-----BEGIN RSA PRIVATE KEY-----\n" * 10_000
    t0 = time.perf_counter()
    got = list(PrivateKeyDetector().detect(text))
    assert time.perf_counter() - t0 < 1.0
    assert len(got) == 10_000 and {text[m.start : m.end] for m in got} == {"-----BEGIN RSA PRIVATE KEY-----"}


_KEY_LINES = (
    "MIIEowIBAAKCAQEAx7Yh2mT9pQ3sR8vL1kN6wJ4bF0cD5eG7hI9jK2lM4nO6pQ8r\n"
    "T5uV7wX9yZ1aB3cD5eF7gH9iJ1kL3mN5oP7qR9sT1uV3wX5yZ7aB9cD1eF3gH5i\n"
)
_ENCRYPTED_HEAD = (
    "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\n"
)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\\n"])
def test_truncated_encrypted_pem_key_is_covered_past_its_headers(newline: str) -> None:
    # A legacy encrypted key cut off before its END line (or still streaming): the Proc-Type and
    # DEK-Info headers and the blank line after them are part of the block, and so is the key.
    text = "here: " + (_ENCRYPTED_HEAD + _KEY_LINES).replace("\n", newline)
    spans = [s for e, s in found(text) if e == "PRIVATE_KEY"]
    assert spans == [text[len("here: ") :].rstrip("\r\n\\n")], spans


def test_pem_blocks_with_end_lines_are_each_one_span() -> None:
    key = _ENCRYPTED_HEAD + _KEY_LINES + "-----END RSA PRIVATE KEY-----"
    other = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"
    text = f"a {key} b -----END CERTIFICATE----- {other} c"
    assert found(text) == {("PRIVATE_KEY", key), ("PRIVATE_KEY", other)}
