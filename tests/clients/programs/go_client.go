// Go's net/http client, driven one scenario at a time (see tests/clients/driver.py).
//
// The transport is a clone of http.DefaultTransport (HTTP/2 offered in ALPN, as by
// default) whose Proxy is http.ProxyFromEnvironment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY),
// except for a scenario that names a "proxy": ProxyFromEnvironment never proxies
// localhost or loopback addresses, so such a target needs Transport.Proxy set to
// http.ProxyURL. CA trust comes from SSL_CERT_FILE. Each stdin line is a scenario as
// JSON; each gets one JSON result line on stdout (and, while streaming, a
// {"event": "first"} line as soon as the first bytes arrived).
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"
)

type scenario struct {
	Scenario string `json:"scenario"`
	URL      string `json:"url"`
	File     string `json:"file"`
	Proxy    string `json:"proxy"`
}

func emit(document map[string]interface{}) {
	line, _ := json.Marshal(document)
	os.Stdout.Write(append(line, '\n'))
}

func client(s scenario) (*http.Client, error) {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	if s.Proxy != "" {
		proxy, err := url.Parse(s.Proxy)
		if err != nil {
			return nil, err
		}
		transport.Proxy = http.ProxyURL(proxy)
	}
	return &http.Client{Transport: transport, Timeout: 30 * time.Second}, nil
}

func run(s scenario) (map[string]interface{}, error) {
	c, err := client(s)
	if err != nil {
		return nil, err
	}
	defer c.CloseIdleConnections()
	var response *http.Response
	if s.Scenario == "upload" {
		body, err := os.Open(s.File)
		if err != nil {
			return nil, err
		}
		defer body.Close()
		response, err = c.Post(s.URL, "application/octet-stream", body)
		if err != nil {
			return nil, err
		}
	} else {
		response, err = c.Get(s.URL)
		if err != nil {
			return nil, err
		}
	}
	defer response.Body.Close()
	if s.Scenario == "stream" {
		digest := sha256.New()
		size := 0
		buffer := make([]byte, 65536)
		for {
			read, err := response.Body.Read(buffer)
			if read > 0 {
				if size == 0 {
					emit(map[string]interface{}{"event": "first", "bytes": read})
				}
				digest.Write(buffer[:read])
				size += read
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, err
			}
		}
		return map[string]interface{}{
			"status": response.StatusCode, "size": size,
			"sha256": hex.EncodeToString(digest.Sum(nil)),
		}, nil
	}
	body, err := io.ReadAll(response.Body)
	if err != nil {
		return nil, err
	}
	return map[string]interface{}{"status": response.StatusCode, "body": string(body)}, nil
}

func main() {
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		var s scenario
		result := map[string]interface{}{}
		if err := json.Unmarshal(lines.Bytes(), &s); err != nil {
			result["error"] = err.Error()
		} else if got, err := run(s); err != nil {
			result["error"] = fmt.Sprintf("%T: %v", err, err)
		} else {
			result = got
		}
		result["result"] = true
		emit(result)
	}
}
