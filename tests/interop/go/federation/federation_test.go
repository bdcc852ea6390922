// Package federation checks Tessera's federation with go-spiffe's own
// federation package, on both sides:
//
//   - go-spiffe's federation.FetchBundle fetches Tessera's bundle endpoint,
//     in the https_spiffe and the https_web profile;
//   - a foreign trust domain, partner.test, is served by go-spiffe's
//     federation.NewHandler; Tessera federates with it, and a go-spiffe
//     X509Source and JWTSource of example.org (Tessera's trust domain) then
//     verify partner.test's SVIDs, see its bundle rotate, and talk
//     spiffetls mTLS with a partner.test server.
//
// The test starts its own Tessera agents (TESSERA_BIN, default
// target/debug/tessera) on free loopback ports; it needs nothing else.
package federation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// wait bounds every wait: a foreign bundle is refetched at its refresh
// hint, which Tessera raises to at least 5 s.
const wait = 40 * time.Second

var (
	exampleOrg = spiffeid.RequireTrustDomainFromString("example.org")
	partner    = spiffeid.RequireTrustDomainFromString("partner.test")
	webTD      = spiffeid.RequireTrustDomainFromString("web.test")
	endpointID = spiffeid.RequireFromString("spiffe://example.org/tessera/bundle-endpoint")
	workloadID = spiffeid.RequireFromString("spiffe://example.org/go-federation")
)

func ctx(t *testing.T) context.Context {
	t.Helper()
	c, cancel := context.WithTimeout(context.Background(), wait)
	t.Cleanup(cancel)
	return c
}

// --- a CA of our own, for partner.test and for Web PKI certificates ---

type ca struct {
	cert *x509.Certificate
	key  crypto.Signer
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func serial(t *testing.T) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func newCA(t *testing.T, td spiffeid.TrustDomain) *ca {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{Organization: []string{"go test CA " + td.Name()}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &ca{cert: cert, key: key}
}

// leaf issues a certificate for id (an X509-SVID when id is set) and/or ips.
func (c *ca) leaf(t *testing.T, id *spiffeid.ID, ips ...net.IP) ([]*x509.Certificate, crypto.Signer) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  ips,
	}
	if id != nil {
		tmpl.URIs = []*url.URL{id.URL()}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return []*x509.Certificate{cert}, key
}

func (c *ca) svid(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	certs, key := c.leaf(t, &id)
	return &x509svid.SVID{ID: id, Certificates: certs, PrivateKey: key}
}

func pemOf(t *testing.T, certs []*x509.Certificate, key crypto.Signer) (certPEM, keyPEM []byte) {
	t.Helper()
	for _, c := range certs {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if key != nil {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	return certPEM, keyPEM
}

// --- partner.test: a bundle endpoint served by go-spiffe's handler ---

// partnerDomain holds partner.test's bundle, which tests change to rotate.
type partnerDomain struct {
	mu     sync.Mutex
	bundle *spiffebundle.Bundle
	seq    uint64
}

func (p *partnerDomain) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if td != partner {
		return nil, fmt.Errorf("no bundle for %s", td)
	}
	return p.bundle.Clone(), nil
}

func (p *partnerDomain) update(f func(b *spiffebundle.Bundle)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(p.bundle)
	p.seq++
	p.bundle.SetSequenceNumber(p.seq)
}

// --- Tessera ---

func tesseraBin(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("TESSERA_BIN"); bin != "" {
		return bin
	}
	bin, err := filepath.Abs("../../../../target/debug/tessera")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s is not built (cargo build -p tessera-agent), or set TESSERA_BIN: %v", bin, err)
	}
	return bin
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

type agent struct {
	socket string
	log    *bytes.Buffer
}

func (a *agent) addr() workloadapi.ClientOption {
	return workloadapi.WithAddr("unix://" + a.socket)
}

// startTessera runs `tessera run` with config (dir is substituted for
// {DIR}); the agent stops when the test ends, and its log is printed if
// the test failed.
func startTessera(t *testing.T, dir, config string) *agent {
	t.Helper()
	path := filepath.Join(dir, "agent.toml")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(config, "{DIR}", dir)), 0o600); err != nil {
		t.Fatal(err)
	}
	log := &bytes.Buffer{}
	cmd := exec.Command(tesseraBin(t), "run", "--config", path)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("---- tessera log (%s) ----\n%s", dir, log.String())
		}
	})
	a := &agent{socket: filepath.Join(dir, "sock", "agent.sock"), log: log}
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(a.socket); err == nil {
			return a
		}
		select {
		case <-done:
			t.Fatalf("tessera exited at start:\n%s", log.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("tessera did not start:\n%s", log.String())
	return nil
}

func entry(id string, federatesWith ...string) string {
	quoted := make([]string, len(federatesWith))
	for i, d := range federatesWith {
		quoted[i] = fmt.Sprintf("%q", d)
	}
	return fmt.Sprintf("[[entries]]\nspiffe_id = %q\nselectors = [\"unix:uid:%d\"]\nfederates_with = [%s]\n",
		id, os.Getuid(), strings.Join(quoted, ", "))
}

// --- the world every test of this package shares ---

type world struct {
	partnerCA  *ca
	partner    *partnerDomain
	partnerURL string
	jwtKey     *ecdsa.PrivateKey
	tessera    *agent
	endpoint   string // Tessera's bundle endpoint URL (https_spiffe)
}

func setUp(t *testing.T) *world {
	t.Helper()
	dir := t.TempDir()
	w := &world{partnerCA: newCA(t, partner), jwtKey: newKey(t)}

	// partner.test's bundle: its CA and a JWT key, refresh hint 1 s.
	b := spiffebundle.New(partner)
	b.AddX509Authority(w.partnerCA.cert)
	if err := b.AddJWTAuthority("partner-jwt-1", w.jwtKey.Public()); err != nil {
		t.Fatal(err)
	}
	b.SetRefreshHint(time.Second)
	b.SetSequenceNumber(1)
	w.partner = &partnerDomain{bundle: b, seq: 1}

	// Its bundle endpoint, https_spiffe: the server presents an X509-SVID.
	handler, err := federation.NewHandler(partner, w.partner)
	if err != nil {
		t.Fatal(err)
	}
	serverID := spiffeid.RequireFromString("spiffe://partner.test/bundle-server")
	serving := w.partnerCA.svid(t, serverID)
	srv := httptest.NewUnstartedServer(handler)
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{{
			Certificate: [][]byte{serving.Certificates[0].Raw},
			PrivateKey:  serving.PrivateKey,
		}},
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	w.partnerURL = srv.URL

	// The bootstrap bundle Tessera starts from: the SPIFFE bundle JSON.
	doc, err := b.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "partner.json"), doc, 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	w.endpoint = fmt.Sprintf("https://127.0.0.1:%d", port)
	w.tessera = startTessera(t, dir, fmt.Sprintf(`trust_domain = "example.org"
socket_path = "{DIR}/sock/agent.sock"
data_dir = "{DIR}/data"

[bundle_endpoint]
listen = "127.0.0.1:%d"
refresh_hint = "7s"

[[federation]]
trust_domain = "partner.test"
bundle_endpoint_url = %q
bundle_endpoint_profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://partner.test/bundle-server"
bootstrap_bundle = "{DIR}/partner.json"

%s`, port, w.partnerURL, entry(workloadID.String(), "partner.test")))
	return w
}

// eventually retries check until it returns nil or wait passes.
func eventually(t *testing.T, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(wait)
	var err error
	for time.Now().Before(deadline) {
		if err = check(); err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %v", what, wait, err)
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[string]bool{}
	for _, c := range a {
		seen[string(c.Raw)] = true
	}
	for _, c := range b {
		if !seen[string(c.Raw)] {
			return false
		}
	}
	return true
}

// TestFetchBundleFromTesseraOverHTTPSSPIFFE: go-spiffe's federation client
// fetches Tessera's bundle endpoint, authenticating it as
// spiffe://example.org/tessera/bundle-endpoint with the bundle the Workload
// API gives; the bundle it gets is the one the Workload API serves.
func TestFetchBundleFromTesseraOverHTTPSSPIFFE(t *testing.T) {
	w := setUp(t)
	c := ctx(t)
	x509Bundles, err := workloadapi.FetchX509Bundles(c, w.tessera.addr())
	if err != nil {
		t.Fatal(err)
	}
	own, err := x509Bundles.GetX509BundleForTrustDomain(exampleOrg)
	if err != nil {
		t.Fatal(err)
	}
	var fetched *spiffebundle.Bundle
	eventually(t, "the bundle endpoint answers", func() error {
		fetched, err = federation.FetchBundle(c, exampleOrg, w.endpoint, federation.WithSPIFFEAuth(own, endpointID))
		return err
	})
	if !sameCerts(fetched.X509Authorities(), own.X509Authorities()) {
		t.Fatalf("the endpoint's CAs differ from the Workload API's")
	}
	jwtBundles, err := workloadapi.FetchJWTBundles(c, w.tessera.addr())
	if err != nil {
		t.Fatal(err)
	}
	ownJWT, err := jwtBundles.GetJWTBundleForTrustDomain(exampleOrg)
	if err != nil {
		t.Fatal(err)
	}
	if len(fetched.JWTAuthorities()) == 0 || len(fetched.JWTAuthorities()) != len(ownJWT.JWTAuthorities()) {
		t.Fatalf("JWT authorities: endpoint %d, Workload API %d", len(fetched.JWTAuthorities()), len(ownJWT.JWTAuthorities()))
	}
	for kid := range ownJWT.JWTAuthorities() {
		if !fetched.HasJWTAuthority(kid) {
			t.Fatalf("the endpoint lacks JWT key %q", kid)
		}
	}
	if seq, ok := fetched.SequenceNumber(); !ok || seq == 0 {
		t.Fatalf("spiffe_sequence: %d, %v", seq, ok)
	}
	if hint, ok := fetched.RefreshHint(); !ok || hint != 7*time.Second {
		t.Fatalf("spiffe_refresh_hint: %v, %v", hint, ok)
	}
	// A JWT-SVID from the Workload API verifies against the fetched bundle.
	token, err := workloadapi.FetchJWTSVID(c, jwtsvid.Params{Audience: "peer"}, w.tessera.addr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := jwtsvid.ParseAndValidate(token.Marshal(), fetched, []string{"peer"}); err != nil {
		t.Fatalf("a JWT-SVID does not verify with the fetched bundle: %v", err)
	}
	// Another SPIFFE ID is refused: the endpoint is authenticated, not just encrypted.
	wrong := spiffeid.RequireFromString("spiffe://example.org/someone-else")
	if _, err := federation.FetchBundle(c, exampleOrg, w.endpoint, federation.WithSPIFFEAuth(own, wrong)); err == nil {
		t.Fatal("FetchBundle accepted an endpoint with another SPIFFE ID")
	}
}

// TestFetchBundleFromTesseraOverHTTPSWeb: the https_web profile, with a
// Web PKI certificate for 127.0.0.1 from a CA go-spiffe is told to trust.
func TestFetchBundleFromTesseraOverHTTPSWeb(t *testing.T) {
	dir := t.TempDir()
	webCA := newCA(t, webTD)
	certs, key := webCA.leaf(t, nil, net.ParseIP("127.0.0.1"))
	certPEM, keyPEM := pemOf(t, certs, key)
	if err := os.WriteFile(filepath.Join(dir, "web.crt"), certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "web.key"), keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	a := startTessera(t, dir, fmt.Sprintf(`trust_domain = "web.test"
socket_path = "{DIR}/sock/agent.sock"
data_dir = "{DIR}/data"

[bundle_endpoint]
listen = "127.0.0.1:%d"
profile = "https_web"
cert_file = "{DIR}/web.crt"
key_file = "{DIR}/web.key"

%s`, port, entry("spiffe://web.test/go")))
	c := ctx(t)
	roots := x509.NewCertPool()
	roots.AddCert(webCA.cert)
	url := fmt.Sprintf("https://127.0.0.1:%d/", port)
	var fetched *spiffebundle.Bundle
	var err error
	eventually(t, "the https_web endpoint answers", func() error {
		fetched, err = federation.FetchBundle(c, webTD, url, federation.WithWebPKIRoots(roots))
		return err
	})
	bundles, err := workloadapi.FetchX509Bundles(c, a.addr())
	if err != nil {
		t.Fatal(err)
	}
	own, err := bundles.GetX509BundleForTrustDomain(webTD)
	if err != nil {
		t.Fatal(err)
	}
	if !sameCerts(fetched.X509Authorities(), own.X509Authorities()) {
		t.Fatal("the https_web endpoint's CAs differ from the Workload API's")
	}
	// Without the CA, the Web PKI check fails.
	if _, err := federation.FetchBundle(c, webTD, url, federation.WithWebPKIRoots(x509.NewCertPool())); err == nil {
		t.Fatal("an untrusted Web PKI certificate was accepted")
	}
}

// TestTesseraFederatesWithAGoSpiffeHandler: Tessera fetches partner.test's
// bundle from go-spiffe's handler; an example.org X509Source verifies
// partner.test SVIDs with it, sees a rotation, and a JWT-SVID of
// partner.test validates through Tessera and a go-spiffe JWTSource.
func TestTesseraFederatesWithAGoSpiffeHandler(t *testing.T) {
	w := setUp(t)
	c := ctx(t)
	source, err := workloadapi.NewX509Source(c, workloadapi.WithClientOptions(w.tessera.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	svid, err := source.GetX509SVID()
	if err != nil {
		t.Fatal(err)
	}
	if svid.ID != workloadID {
		t.Fatalf("SVID %s, want %s", svid.ID, workloadID)
	}

	peer := w.partnerCA.svid(t, spiffeid.RequireFromString("spiffe://partner.test/server"))
	if _, _, err := x509svid.Verify(peer.Certificates, source); err != nil {
		t.Fatalf("a partner.test SVID does not verify through Tessera's federated bundle: %v", err)
	}

	// Rotation: partner.test adds a new CA and signs with it; Tessera
	// fetches the new bundle and pushes it to the open source.
	next := newCA(t, partner)
	w.partner.update(func(b *spiffebundle.Bundle) { b.AddX509Authority(next.cert) })
	rotated := next.svid(t, spiffeid.RequireFromString("spiffe://partner.test/server"))
	eventually(t, "the rotated partner CA reaches the X509Source", func() error {
		_, _, err := x509svid.Verify(rotated.Certificates, source)
		return err
	})

	// JWT: a partner.test JWT-SVID, signed with its published key.
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: w.jwtKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", "partner-jwt-1"))
	if err != nil {
		t.Fatal(err)
	}
	token, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  "spiffe://partner.test/client",
		Audience: jwt.Audience{"example-api"},
		Expiry:   jwt.NewNumericDate(time.Now().Add(5 * time.Minute)),
		IssuedAt: jwt.NewNumericDate(time.Now()),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	jwtSource, err := workloadapi.NewJWTSource(c, workloadapi.WithClientOptions(w.tessera.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer jwtSource.Close()
	eventually(t, "partner.test's JWT key reaches the JWTSource", func() error {
		_, err := jwtsvid.ParseAndValidate(token, jwtSource, []string{"example-api"})
		return err
	})
	client, err := workloadapi.New(c, w.tessera.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	validated, err := client.ValidateJWTSVID(c, token, "example-api")
	if err != nil {
		t.Fatalf("Tessera's ValidateJWTSVID refused a federated JWT-SVID: %v", err)
	}
	if validated.ID.String() != "spiffe://partner.test/client" {
		t.Fatalf("validated %s", validated.ID)
	}
	// A token signed by partner.test's key but claiming example.org is refused:
	// each domain's tokens verify only with that domain's keys.
	forged, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  workloadID.String(),
		Audience: jwt.Audience{"example-api"},
		Expiry:   jwt.NewNumericDate(time.Now().Add(5 * time.Minute)),
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.ValidateJWTSVID(c, forged, "example-api"); err == nil {
		t.Fatal("a partner.test key signed for example.org and Tessera accepted it")
	}
	if _, err := jwtsvid.ParseAndValidate(forged, jwtSource, []string{"example-api"}); err == nil {
		t.Fatal("go-spiffe accepted the forged token (the judge is broken)")
	}
}

// TestSpiffeTLSAcrossTrustDomains: a partner.test server trusts example.org
// through the bundle it fetched from Tessera's endpoint with go-spiffe's
// federation client; an example.org client trusts partner.test through
// Tessera's federated bundle. They speak spiffetls mTLS, each authorizing
// the other's trust domain.
func TestSpiffeTLSAcrossTrustDomains(t *testing.T) {
	w := setUp(t)
	c := ctx(t)
	source, err := workloadapi.NewX509Source(c, workloadapi.WithClientOptions(w.tessera.addr()))
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	own, err := source.GetX509BundleForTrustDomain(exampleOrg)
	if err != nil {
		t.Fatal(err)
	}
	var exampleBundle *spiffebundle.Bundle
	eventually(t, "Tessera's bundle endpoint answers", func() error {
		exampleBundle, err = federation.FetchBundle(c, exampleOrg, w.endpoint, federation.WithSPIFFEAuth(own, endpointID))
		return err
	})
	serverSVID := w.partnerCA.svid(t, spiffeid.RequireFromString("spiffe://partner.test/server"))
	partnerBundle := x509bundle.FromX509Authorities(partner, []*x509.Certificate{w.partnerCA.cert})
	serverTrust := x509bundle.NewSet(partnerBundle, exampleBundle.X509Bundle())

	listener, err := spiffetls.ListenWithMode(c, "tcp", "127.0.0.1:0",
		spiffetls.MTLSServerWithRawConfig(tlsconfig.AuthorizeMemberOf(exampleOrg), serverSVID, serverTrust))
	if err != nil {
		t.Fatal(err)
	}
	defer listener.Close()
	served := make(chan string, 4)
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				line := make([]byte, 5)
				if _, err := io.ReadFull(conn, line); err != nil {
					served <- "read: " + err.Error()
					return
				}
				peer, err := spiffetls.PeerIDFromConn(conn)
				if err != nil {
					served <- "peer: " + err.Error()
					return
				}
				_, _ = conn.Write([]byte("pong!"))
				served <- peer.String() + " said " + string(line)
			}()
		}
	}()
	conn, err := spiffetls.DialWithMode(c, "tcp", listener.Addr().String(),
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeMemberOf(partner), source))
	if err != nil {
		t.Fatalf("mTLS from example.org to partner.test: %v", err)
	}
	defer conn.Close()
	serverID, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("ping!")); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, 5)
	if _, err := io.ReadFull(conn, reply); err != nil {
		t.Fatal(err)
	}
	if got := <-served; got != workloadID.String()+" said ping!" || string(reply) != "pong!" {
		t.Fatalf("server saw %q, client got %q", got, reply)
	}
	if serverID.String() != "spiffe://partner.test/server" {
		t.Fatalf("the client talked to %s", serverID)
	}
	// Authorizing only example.org peers, the same dial is refused: the
	// cross-domain trust is exactly the federated one.
	wrong, err := spiffetls.DialWithMode(c, "tcp", listener.Addr().String(),
		spiffetls.MTLSClientWithSource(tlsconfig.AuthorizeMemberOf(exampleOrg), source))
	if err == nil {
		// The handshake may complete lazily: the first exchange must fail.
		_, werr := wrong.Write([]byte("ping!"))
		buf := make([]byte, 5)
		_, rerr := io.ReadFull(wrong, buf)
		wrong.Close()
		if werr == nil && rerr == nil {
			t.Fatal("a partner.test server passed as example.org")
		}
	}
}
